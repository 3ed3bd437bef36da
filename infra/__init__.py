"""The topx CDK app. Of topx it imports only topx.contract (standard library only): synthesis must not
need numpy, torch or faiss."""
