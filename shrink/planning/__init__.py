"""Planning a budget: the cost model (the one place that prices anything), the types schedules plan
with, the schedules, and what a run plans with."""
