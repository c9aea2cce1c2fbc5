"""One router per resource: chat, models, retrieve, admin, system."""
