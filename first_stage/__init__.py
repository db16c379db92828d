"""first-stage: train, export and evaluate the KL autoencoder that latent diffusion runs on."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("first-stage")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
