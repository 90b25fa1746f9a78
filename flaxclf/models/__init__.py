"""The encoders and their classifiers: one folder per encoder (bert/, modernbert/), the interface every folder
provides (interface.py), the registry that lists them (registry.py), and the classifier config with the one way
to build any family's module (classifier.py)."""
