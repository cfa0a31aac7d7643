"""The commands after training: export, evaluate, predict, diagnose, inspect, lr-find, schedule."""
