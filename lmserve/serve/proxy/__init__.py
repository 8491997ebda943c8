"""`lmserve serve proxy`: one OpenAI endpoint in front of many api_server nodes (and `serve api_server --dp N`)."""
