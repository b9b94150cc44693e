"""The driver: Ray, the drain loop, signals, progress and the terminal, start-up."""
