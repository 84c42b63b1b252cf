"""The operator: a thin kopf shell around pure decisions (allocation, status) and the planner."""
