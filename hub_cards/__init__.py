"""Model-card templates and Hub export (installed as `lavit.hub_cards`)."""

from .export import (
    check_export_folder,
    export_loaded,
    export_model,
    model_card,
    push_to_hub,
    read_metadata,
)

__all__ = ["check_export_folder", "export_loaded", "export_model", "model_card", "push_to_hub", "read_metadata"]
