"""The real-time side: the streaming loop over the pipeline stages, its line sources and
valve sinks, line health, and the particle-parallel feature workers."""
