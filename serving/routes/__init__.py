"""One router per concern: predictions in every protocol, feedback, health and metrics, admin."""
