"""Files every stage writes: atomic writes, safe names, exclusive locks."""
