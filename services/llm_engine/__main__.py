"""`python -m services.llm_engine`: run the LLM engine in the foreground."""

from promptline.service_main import run_service

from .server import start_engine

if __name__ == "__main__":
    run_service("llm_engine", lambda config, live: start_engine(config, live=live))
