"""Federation: a hub's entities as first-class entities on a main Home Assistant, commands routed back."""
