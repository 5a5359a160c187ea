"""Model definitions: one decoder for every supported family, and its weight loader."""
