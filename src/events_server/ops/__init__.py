"""What every long-running process shares: JSON logs, Prometheus exposition, and
settings read from the environment or flags."""
