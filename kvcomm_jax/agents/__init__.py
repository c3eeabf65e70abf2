"""Multi-agent pipelines: agent graphs, benchmark tasks, the code sandbox, the pipeline runner."""
