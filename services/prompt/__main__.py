"""`python -m services.prompt`: run the prompt service in the foreground."""

from promptline.service_main import run_service

from .server import start_prompt

if __name__ == "__main__":
    run_service("prompt", start_prompt)
