"""prmtool: curate process-supervision data for LLM reasoning."""

__version__ = "0.1.0"
