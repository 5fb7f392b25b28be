"""The simulated deployment: the clients' devices (devices) and the clock that schedules a round (clock)."""
