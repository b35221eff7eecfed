"""Generation with the trained transformer: the unmasking scheduler, tasks, decoding."""
