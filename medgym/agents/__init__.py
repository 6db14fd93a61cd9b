"""The agent: a LangGraph planner loop over the medgym tools, planner backends, and chat."""
