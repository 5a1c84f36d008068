"""Running the study: crash safety (dead-run detection, one writer per output, fault injection for
the tests) and how its steps fill the cards (``schedule``)."""
