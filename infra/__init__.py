"""The topx CDK app. Never imports topx: synthesis must not need torch or faiss."""
