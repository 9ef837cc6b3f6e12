"""Console entry points: thin absl mains over the library."""
