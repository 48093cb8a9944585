"""The streaming pipeline: Faust app, topics, sinks and the command line."""
