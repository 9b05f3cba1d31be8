"""The command line, as a new user meets it."""
