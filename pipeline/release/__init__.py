"""After registration: the reviewer's decision, the canary, online evaluation on live labels, and rollback.
Every move of the `champion` alias goes through `registry.move_champion` (compare-and-set under the lock)."""
