"""Workers: the model runner (prepare inputs -> run -> sample), KV sizing, executors."""
