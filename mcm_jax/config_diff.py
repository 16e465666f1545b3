"""Configs and settings compared field by field: flattened to dotted names, and the fields where
two differ (what a refused resume or a reused trajectory bank reports)."""


def flat_fields(tree, prefix=""):
  """{'teacher.optim.learning_rate': value} for a ConfigDict or a JSON-like dict (sections that
  are empty count as a field)."""
  out = {}
  for key, value in tree.items():
    if hasattr(value, "items") and len(value):
      out.update(flat_fields(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def differing_fields(old, new):
  """{key: (old value, new value)} for the keys where two JSON-like dicts (or None) differ."""
  old, new = old or {}, new or {}
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)}
