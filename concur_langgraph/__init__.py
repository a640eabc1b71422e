"""concur-langgraph."""
