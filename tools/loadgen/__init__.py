"""wirehub load generator (installed as wirehub.loadgen)."""
