"""`python -m services.prompt`: run the prompt service in the foreground."""

from promptline.service_main import run_service

from .server import start_prompt

if __name__ == "__main__":
    run_service("prompt", lambda config, live: start_prompt(config, live=live))
