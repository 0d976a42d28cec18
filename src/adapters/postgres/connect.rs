//! Opening a pool on one host: the database created when it is missing, the server named for messages.

use std::time::Duration;

use sea_orm::sqlx::{self, postgres::PgConnectOptions, Connection as _, Executor as _};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};

use super::error::{is_concurrent_creation, is_missing_database, PgError};
use crate::telemetry::redact_url;

/// How long opening a connection, or waiting for a free one in the pool, may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The same wait, for a pool on one of several hosts: a pool keeps trying a host that refuses
/// connections until this runs out, and only then does its caller look for a promoted standby.
pub(super) const FAILOVER_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Opens the pool. Statement logging is off: the driver logs batches, and a line per statement would drown
/// everything else.
async fn open(url: &str, acquire: Duration) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url);
    options
        .connect_timeout(CONNECT_TIMEOUT)
        .acquire_timeout(acquire)
        .sqlx_logging(false);
    Database::connect(options).await
}

/// The options of a URL of one host.
pub(super) fn options_of(url: &str) -> Result<PgConnectOptions, PgError> {
    url.parse().map_err(|source| PgError::InvalidUrl {
        url: redact_url(url),
        source,
    })
}

/// `postgres://user@host:port/database`, for messages.
pub(super) fn server_name(options: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options
            .get_database()
            .unwrap_or_else(|| options.get_username())
    )
}

/// A pool on the one host of `url`, and the server's name; `acquire` bounds each wait for a
/// connection. When the database does not exist, creates it through the `postgres` database of the
/// same server (if the role may), tolerating another process creating it at the same moment.
pub(super) async fn open_pool(
    url: &str,
    acquire: Duration,
) -> Result<(DatabaseConnection, String), PgError> {
    let options = options_of(url)?;
    let database = options
        .get_database()
        .unwrap_or_else(|| options.get_username())
        .to_owned();
    let server = server_name(&options);
    let db = match open(url, acquire).await {
        Ok(db) => db,
        Err(e) if is_missing_database(&e) => {
            create_database(&options, &database, &server).await?;
            open(url, acquire)
                .await
                .map_err(|source| PgError::Connect {
                    server: server.clone(),
                    source,
                })?
        }
        Err(source) => return Err(PgError::Connect { server, source }),
    };
    Ok((db, server))
}

/// `CREATE DATABASE` through the server's `postgres` database.
async fn create_database(
    options: &PgConnectOptions,
    database: &str,
    server: &str,
) -> Result<(), PgError> {
    let fail = |source| PgError::CreateDatabase {
        server: server.to_owned(),
        database: database.to_owned(),
        source,
    };
    let admin =
        sqlx::ConnectOptions::disable_statement_logging(options.clone().database("postgres"));
    let mut conn = sqlx::PgConnection::connect_with(&admin)
        .await
        .map_err(fail)?;
    let create = format!("CREATE DATABASE \"{}\"", database.replace('"', "\"\""));
    let created = conn.execute(create.as_str()).await;
    // The database exists either way; a failed close only leaks a connection the server will reap.
    let _ = conn.close().await;
    match created {
        Ok(_) => {
            tracing::info!(%server, "created the database");
            Ok(())
        }
        Err(e) if is_concurrent_creation(&e) => Ok(()),
        Err(e) => Err(fail(e)),
    }
}
