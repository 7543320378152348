import { ServerConnection } from '@jupyterlab/services';

import { messageFromBody, PoolAPI, PoolAPIError } from '../api';

/** A minimal Request: enough for ServerConnection.makeRequest. */
class FakeRequest {
  headers = new Map<string, string>();
  method: string;
  body: unknown;
  constructor(
    readonly url: string,
    init: { method?: string; body?: unknown } = {}
  ) {
    this.method = init.method ?? 'GET';
    this.body = init.body;
    const headers = this.headers;
    (this.headers as any).append = (k: string, v: string) => headers.set(k, v);
  }
}

function server(status: number, body: string) {
  const seen: FakeRequest[] = [];
  const settings = ServerConnection.makeSettings({
    baseUrl: 'http://localhost:8888/base/',
    token: 'abc',
    Request: FakeRequest as any,
    fetch: (async (request: FakeRequest) => {
      seen.push(request);
      return {
        ok: status < 400,
        status,
        statusText: status < 400 ? 'OK' : 'Conflict',
        text: async () => body
      };
    }) as any
  });
  return { api: new PoolAPI(settings), seen };
}

describe('PoolAPI', () => {
  it('GETs the pool under the base URL with the token', async () => {
    const { api, seen } = server(200, '{"devices": [], "kernels": [], "queue": [], "time": 1}');
    const pool = await api.pool();
    expect(pool.kernels).toEqual([]);
    expect(seen[0].url).toMatch(/^http:\/\/localhost:8888\/base\/singularity\/api\/pool(\?\d+)?$/);
    expect(seen[0].headers.get('Authorization')).toBe('token abc');
  });

  it('GETs who I am', async () => {
    const { api, seen } = server(200, '{"user": "ada", "username": "ada", "admin": false}');
    expect(await api.me()).toEqual({ user: 'ada', username: 'ada', admin: false });
    expect(seen[0].url).toMatch(/\/base\/singularity\/api\/me(\?\d+)?$/);
    expect(seen[0].method).toBe('GET');
  });

  it('POSTs actions with their JSON body', async () => {
    const { api, seen } = server(200, '{"kernel_id": "k/1", "events": []}');
    await api.pin('k/1', true);
    expect(seen[0].url).toMatch(/\/base\/singularity\/api\/kernels\/k%2F1\/pin(\?\d+)?$/);
    expect(seen[0].method).toBe('POST');
    expect(JSON.parse(seen[0].body as string)).toEqual({ pinned: true });
    await api.offload('k1');
    expect(seen[1].url).toMatch(/kernels\/k1\/offload(\?\d+)?$/);
    await api.restore('k1');
    expect(seen[2].url).toMatch(/kernels\/k1\/restore(\?\d+)?$/);
    await api.setQuotas({ default: {} });
    expect(seen[3].method).toBe('PUT');
  });

  it('GETs the history with its window and days as query parameters', async () => {
    const { api, seen } = server(200, '{}');
    await api.timeline(1000, 4600);
    expect(seen[0].url).toMatch(/\/base\/singularity\/api\/timeline\?since=1000&until=4600(&\d+)?$/);
    await api.gpuTime(7);
    expect(seen[1].url).toMatch(/\/base\/singularity\/api\/gpu-time\?days=7(&\d+)?$/);
  });

  it('throws the server\'s JSON message when it refuses', async () => {
    const { api } = server(
      409,
      '{"message": "kernel is running: only an idle resident kernel can be offloaded", "reason": null}'
    );
    const error = await api.offload('k1').catch(e => e);
    expect(error).toBeInstanceOf(PoolAPIError);
    expect(error.status).toBe(409);
    expect(error.message).toBe('kernel is running: only an idle resident kernel can be offloaded');
  });
});

describe('messageFromBody', () => {
  it('prefers the JSON message, then says what the status means', () => {
    expect(messageFromBody(400, 'Bad Request', '{"message": "bad body"}')).toBe('bad body');
    expect(messageFromBody(403, 'Forbidden', '<html>')).toBe(
      'the server refused: permission denied'
    );
    expect(messageFromBody(404, 'Not Found', '')).toContain('jupyter-singularity enabled');
    expect(messageFromBody(500, 'Internal Server Error', '{}')).toBe(
      'the server answered 500 Internal Server Error'
    );
  });
});
