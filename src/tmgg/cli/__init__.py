"""tmgg-train and tmgg-sweep: the commands and the reports (the top layer)."""
