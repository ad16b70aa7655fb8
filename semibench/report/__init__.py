"""Tables and statistics from run metrics."""
