"""Reading recordings, tokenising G-code, windowing, splitting, caching, augmenting."""
