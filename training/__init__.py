"""Training stages, data and collators for LaVIT (installed as `lavit.training`)."""
