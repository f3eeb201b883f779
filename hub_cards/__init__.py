"""Model-card templates and Hub export (installed as `lavit.hub_cards`)."""
