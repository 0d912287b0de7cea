"""`python -m demo`: serve the multimodal chat (see demo.app)."""

from demo.app import main

main()
