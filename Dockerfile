# MagCache Studio as a Hugging Face Docker Space (also runs anywhere: docker run -p 7860:7860 <image>).
FROM python:3.11-slim

# Spaces run the container as user 1000; everything it writes lives in its home.
RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/home/user/.cache/huggingface \
    MPLCONFIGDIR=/home/user/.cache/matplotlib \
    GRADIO_ANALYTICS_ENABLED=False \
    MAGCACHE_HOST=0.0.0.0 \
    MAGCACHE_PORT=7860
WORKDIR $HOME/app

COPY --chown=user requirements.txt .
RUN pip install --user -r requirements.txt && mkdir -p $HF_HOME $MPLCONFIGDIR
COPY --chown=user . .

EXPOSE 7860
CMD ["python", "app.py"]
