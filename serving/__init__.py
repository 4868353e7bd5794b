"""The online model server: predictions, feedback, durable prediction log, alias-following hot reload."""
