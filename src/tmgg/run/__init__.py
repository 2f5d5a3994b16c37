"""The executor: one job or a fused group, in any process; knows no launcher."""
