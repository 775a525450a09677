"""The AI regime advisor around ``ai_advisor``'s panel: the pure override rails (``policy``) and the
runtime that asks in a background thread and holds the opinion and the override (``runtime``)."""
