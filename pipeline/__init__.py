"""radtriage core package: archive, receiver, dispatch, results, worklist and web app."""

__version__ = "0.1.0"
