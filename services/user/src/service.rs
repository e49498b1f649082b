//! The gRPC face of the user service: converts between the generated
//! messages and the domain, and domain errors into gRPC statuses.

use prost_types::Timestamp;
use tonic::{Request, Response, Status};
use trellis::Error;

use crate::{
    api::v1::{
        CreateUserRequest, DeleteUserRequest, GetUserRequest, ListNotificationsRequest,
        ListNotificationsResponse, ListUsersRequest, ListUsersResponse, Notification,
        UpdateUserRequest, User, user_service_server::UserService,
    },
    biz::{self, UserChanges, UserRepo, Users},
    notify,
};

/// Implements `shop.user.v1.UserService` over the [`Users`] use cases.
#[derive(Debug, Clone)]
pub struct UserServiceHandler<R> {
    users: Users<R>,
    notifications: Option<trellis_store::Pool>,
}

impl<R: UserRepo> UserServiceHandler<R> {
    /// A handler over `users` (without notifications: ListNotifications is
    /// UNIMPLEMENTED).
    pub fn new(users: Users<R>) -> Self {
        UserServiceHandler {
            users,
            notifications: None,
        }
    }

    /// Serves the notifications [`notify::run`] keeps in `pool`.
    pub fn with_notifications(mut self, pool: trellis_store::Pool) -> Self {
        self.notifications = Some(pool);
        self
    }
}

fn timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn to_proto(user: biz::User) -> User {
    User {
        id: user.id,
        email: user.email,
        display_name: user.display_name,
        create_time: Some(timestamp(user.create_time_ms)),
        update_time: Some(timestamp(user.update_time_ms)),
    }
}

/// Which fields an update touches: the mask's paths, or both when empty.
fn changes(user: &User, mask: Option<&prost_types::FieldMask>) -> Result<UserChanges, Error> {
    let paths: Vec<&str> = match mask {
        Some(m) if !m.paths.is_empty() => m.paths.iter().map(String::as_str).collect(),
        _ => vec!["email", "display_name"],
    };
    let mut changes = UserChanges::default();
    for path in paths {
        match path {
            "email" => changes.email = Some(user.email.clone()),
            "display_name" | "displayName" => {
                changes.display_name = Some(user.display_name.clone())
            }
            other => {
                return Err(Error::invalid_argument(
                    "update_mask",
                    format!("cannot update {other:?}: updatable fields are email and display_name"),
                ));
            }
        }
    }
    Ok(changes)
}

#[tonic::async_trait]
impl<R: UserRepo> UserService for UserServiceHandler<R> {
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<User>, Status> {
        let user = request
            .into_inner()
            .user
            .ok_or_else(|| Error::invalid_argument("user", "user is required"))?;
        let created = self.users.create(&user.email, &user.display_name).await?;
        Ok(Response::new(to_proto(created)))
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let user = self.users.get(&request.get_ref().id).await?;
        Ok(Response::new(to_proto(user)))
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let req = request.into_inner();
        let page = self.users.list(req.page_size, &req.page_token).await?;
        Ok(Response::new(ListUsersResponse {
            users: page.users.into_iter().map(to_proto).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn update_user(
        &self,
        request: Request<UpdateUserRequest>,
    ) -> Result<Response<User>, Status> {
        let req = request.into_inner();
        let user = req
            .user
            .ok_or_else(|| Error::invalid_argument("user", "user is required"))?;
        let changes = changes(&user, req.update_mask.as_ref())?;
        let updated = self.users.update(&user.id, changes).await?;
        Ok(Response::new(to_proto(updated)))
    }

    async fn delete_user(
        &self,
        request: Request<DeleteUserRequest>,
    ) -> Result<Response<()>, Status> {
        self.users.delete(&request.get_ref().id).await?;
        Ok(Response::new(()))
    }

    async fn list_notifications(
        &self,
        request: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        let Some(pool) = &self.notifications else {
            return Err(Status::unimplemented("notifications are not kept here"));
        };
        let r = request.get_ref();
        let user_id = &r.user_id;
        if user_id.is_empty()
            || user_id.len() > 128
            || !user_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(
                Error::invalid_argument("user_id", "1 to 128 visible ASCII characters").into(),
            );
        }
        trellis::service::owner_only(
            request.metadata(),
            user_id,
            "NOT_YOUR_NOTIFICATIONS",
            "notifications are visible to their user only",
        )?;
        let limit = match r.page_size {
            0 => 20,
            n @ 1..=100 => n as u32,
            _ => return Err(Error::invalid_argument("page_size", "0 to 100").into()),
        };
        let notifications = notify::list(pool, user_id, limit)
            .await?
            .into_iter()
            .map(|n| Notification {
                id: n.id,
                kind: n.kind,
                order_id: n.order_id,
                text: n.text,
                create_time: Some(timestamp(n.create_time_ms)),
            })
            .collect();
        Ok(Response::new(ListNotificationsResponse { notifications }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_split_milliseconds() {
        assert_eq!(
            timestamp(1_700_000_000_123),
            Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_000_000
            }
        );
        assert_eq!(
            timestamp(-1),
            Timestamp {
                seconds: -1,
                nanos: 999_000_000
            }
        );
    }

    #[test]
    fn unknown_mask_path_names_the_field() {
        let mask = prost_types::FieldMask {
            paths: vec!["id".into()],
        };
        let err = changes(&User::default(), Some(&mask)).unwrap_err();
        assert_eq!(err.metadata()["field"], "update_mask");
    }
}
