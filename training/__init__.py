"""Training side of APTP: data, the toy world, router, losses and the two training phases."""
