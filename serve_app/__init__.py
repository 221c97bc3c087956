"""Ray Serve application for Stand-In video generation."""
