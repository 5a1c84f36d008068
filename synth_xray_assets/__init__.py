"""synth-xray: a Dagster platform for making, judging and using synthetic chest X-rays."""
