"""`flywheel backtest`: replay a user's own history through the real loop before going live, period by period,
test-then-train, against reference models on the same rows."""
