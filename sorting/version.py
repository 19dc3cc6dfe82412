"""The package version, recorded in every model it trains."""
VERSION = "0.1.0"
