FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY meter meter
COPY api api
COPY persistence persistence
COPY lua lua
RUN pip install --no-cache-dir .
EXPOSE 8000
CMD ["tokenmeter", "serve", "--host", "0.0.0.0", "--port", "8000"]
